"""`frugal bench`: the command (command.py) over the workloads of each stage (workloads.py, with
model FLOPs in flops.py), the comparison with a peer framework (compare.py: its rows; peers.py:
the workloads and runners; trl_grpo.py: TRL's GRPO with and without vLLM) and the sweep over
strategies (strategies.py); common.py holds what they share."""
