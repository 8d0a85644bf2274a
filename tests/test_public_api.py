"""The public API imports as the seeds wrote it, the optional engines stay lazy, and the
package's layers import only downwards."""
import ast
import subprocess
import sys
from pathlib import Path

import frugal_rlhf

# Lower rank = lower layer (docs/design.md): a module may import its own layer or lower ones.
RANK = {"errors": 0, "libc": 0, "rundir": 0, "checkpoints": 0, "runlog": 0, "trackers": 0, "config": 0,
        "engine_choice": 0, "device": 0, "ops": 0, "models": 1,
        "data": 1, "strategies": 2, "generation": 3, "rl": 4, "serve": 4, "trainers": 5, "bench": 6, "app": 6, "cli": 7,
        "__main__": 7}


def test_trainers_and_strategies_import_from_their_packages():
    from frugal_rlhf.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, NaiveStrategy, make_strategy
    from frugal_rlhf.strategies.deepspeed import DeepSpeedStrategy as DeepSpeedFromModule
    from frugal_rlhf.strategies.fsdp import FSDPStrategy as FSDPFromModule
    from frugal_rlhf.trainers import PPOTrainer, RewardTrainer, SFTTrainer
    from frugal_rlhf.trainers.ppo import PPOTrainer as PPOFromModule

    assert PPOTrainer is PPOFromModule and {SFTTrainer.stage, RewardTrainer.stage, PPOTrainer.stage} == {"sft", "rm",
                                                                                                          "ppo"}
    assert FSDPStrategy is FSDPFromModule and DeepSpeedStrategy is DeepSpeedFromModule
    assert type(make_strategy("naive")) is NaiveStrategy and type(make_strategy("ddp")) is DDPStrategy
    assert type(make_strategy("fsdp", zero_stage=2)) is FSDPStrategy


def test_deepspeed_and_fsdp_are_imported_on_first_use_only():
    code = ("import sys; from frugal_rlhf.strategies import NaiveStrategy, DDPStrategy; import frugal_rlhf.trainers; "
            "print(sorted(m for m in ('deepspeed', 'frugal_rlhf.strategies.fsdp', 'frugal_rlhf.strategies.deepspeed') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path, package: str):
    """Every frugal_rlhf module `path` imports, at its top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from ([module] if node.module else [f"{module}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_module_imports_a_higher_layer():
    root = Path(frugal_rlhf.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        package = ".".join(("frugal_rlhf", *parts[:-1]))
        layer = parts[0] if len(parts) > 1 or parts[0] != "__init__" else "__main__"
        assert layer in RANK, f"{'/'.join(parts)}: a top-level module outside the layers of docs/design.md"
        for module in _imports(path, package):
            other = module.split(".")[1] if module.startswith("frugal_rlhf.") else None
            if other in RANK and RANK[other] > RANK.get(layer, 99):
                upward.append(f"{'/'.join(parts)} imports {module}")
    assert not upward, upward


def test_imports_sit_at_module_top_but_the_ones_kept_lazy_on_purpose():
    """A function-level import hides an arrow of the graph (that is how an import circle once went
    unseen). Kept lazy: the web stack of `frugal serve` (an optional extra), the commands
    the command line loads for the one command it runs, and the pipeline's stages, which import
    torch where a stage runs and never in the pipeline's own process (app/pipeline.py)."""
    root = Path(frugal_rlhf.__file__).parent
    allowed = {("serve/command.py", "frugal_rlhf.serve.app"), ("app/pipeline.py", "frugal_rlhf.app.pipeline_stages")}
    nested = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        parts = path.relative_to(root).with_suffix("").parts
        package = ".".join(("frugal_rlhf", *parts[:-1]))
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = ast.Module(body=fn.body, type_ignores=[])
                for module in _imports_in(body, package):
                    if module.startswith("frugal_rlhf") and (rel, module) not in allowed:
                        nested.append(f"{rel}:{fn.name} imports {module}")
    assert not nested, nested


def _imports_in(tree, package: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_help_needs_no_model_library():
    """`frugal --help` and `frugal sft --help` answer without importing transformers (cli._load)."""
    code = ("import sys\nfrom frugal_rlhf.cli import main\nfor argv in (['--help'], ['sft', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\nprint('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_a_command_exit_code_reaches_the_shell():
    from frugal_rlhf.cli import main

    assert main(["chat", "tiny-llama", "--max-new-tokens", "0"]) == 2  # refused before any model loads
