"""`frugal bench`: the command (command.py) over the workloads of each stage (workloads.py, with
model FLOPs in flops.py), the comparison with a peer framework (peers.py) and the sweep over
strategies (strategies.py); common.py holds what they share."""
