"""The model card (README.md, Hugging Face layout) written into every exported final/: YAML
front matter (license inherited from the base, base_model, tags) and what was trained, on what,
with which numbers and how to do it again, so the folder can be uploaded to a hub as it is."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import yaml

from ..rundir import atomic_write
from .loading import default_gguf_path

# The embedded default is a quantized copy of this hub model.
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _front_matter(readme: Path) -> dict:
    text = readme.read_text() if readme.is_file() else ""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


def base_facts(spec: str) -> tuple[str | None, str]:
    """(hub id of the base model or None, its license) for a model spec."""
    path = Path(spec).expanduser()
    if spec == "default" or path.suffix == ".gguf":
        import gguf

        field = gguf.GGUFReader(default_gguf_path() if spec == "default" else path).get_field("general.license")
        return (DEFAULT_BASE if spec == "default" else None), (field.contents() if field else "unknown")
    if path.is_dir():  # a model we trained: its own card says where it came from
        meta = _front_matter(path / "README.md")
        return meta.get("base_model"), meta.get("license", "unknown")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, "unknown"  # a hub id: its license is on its hub page, not here
    return None, "unknown"  # tiny-* and benchmark shapes: random weights


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def _results(rows: list[dict]) -> list[str]:
    """The held-out numbers at the first and last evaluation, and the last training step's."""
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    lines = []
    if evals:
        first, last = evals[0], evals[-1]
        lines += [f"| held-out | step {first['step']} | step {last['step']} |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(first.get(k, ''))} | {_fmt(last[k])} |" for k in last if k.startswith("eval_")]
    if rows:
        train = rows[-1]
        keys = [k for k in ("loss", "reward", "kl", "accuracy") if k in train]
        lines += ["", f"Last training step ({train['step']}): " + ", ".join(f"{k} {_fmt(train[k])}" for k in keys)]
    return lines


def write_model_card(final: Path, method: str, stage: str, config, rows: list[dict], gguf_file: Path | None = None):
    """final/README.md, and final/frugal_config.yaml: the resolved config the card's command reruns."""
    base_id, license_ = base_facts(config.model)
    settings = dataclasses.asdict(config)
    atomic_write(final / "frugal_config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(settings, sort_keys=False)))
    meta = {"license": license_, **({"base_model": base_id} if base_id else {}), "library_name": "transformers",
            "pipeline_tag": "text-generation", "tags": ["frugal-rlhf", method.lower(), "gguf"] if gguf_file
            else ["frugal-rlhf", method.lower()]}
    data = getattr(config, "prompts", None) if stage == "ppo" else config.data
    lora = f"LoRA rank {config.lora_rank}, merged into the weights" if config.lora_rank else "full fine-tuning"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {final.parent.name}", "",
        f"{method} of `{config.model}`" + (f" ({base_id})" if base_id else "") + f" with frugal-rlhf: {lora}, "
        f"{config.max_steps} steps, learning rate {config.lr}, seed {config.seed}, compute dtype {config.dtype}.", "",
        "## Data", "", f"`{data}`" + (f"; rewards from `{config.reward_model}`" if stage == "ppo" and not config.reward
                                    else f"; rewards {config.reward}" if stage == "ppo" else ""), "",
        "## Results", "", *_results(rows), "",
        "## Reproduce", "", "```", f"frugal {stage} --config frugal_config.yaml --output OUT", "```", "",
        "(`frugal_config.yaml` beside this card holds every setting; its paths are those of the machine that "
        "trained it.)", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```",
    ]
    if gguf_file is not None:
        lines += ["", f"`{gguf_file.name}` is the same model for llama.cpp and Ollama "
                      "(see the project's docs/elsewhere.md)."]
    lines += ["", f"License: {license_}, inherited from the base model."]
    atomic_write(final / "README.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
