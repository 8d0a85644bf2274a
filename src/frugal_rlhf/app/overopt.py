"""The over-optimization picture (Gao et al. 2022): the gold and the proxy (reward-model)
score of the held-out answers against sqrt(KL to the reference), at each of PPO's
evaluations. A proxy that keeps rising while gold stops is the reward model being gamed."""
from __future__ import annotations

from pathlib import Path


def curve(ppo_metrics: list[dict]) -> list[dict]:
    """The evaluation points of a PPO run: step, sqrt KL, gold and proxy gains over the first point."""
    pts = [r for r in ppo_metrics if "eval_gold" in r and "eval_reward" in r and "eval_kl" in r]
    if not pts:
        return []
    g0, p0 = pts[0]["eval_gold"], pts[0]["eval_reward"]
    return [{"step": r["step"], "sqrt_kl": max(r["eval_kl"], 0.0) ** 0.5, "gold": r["eval_gold"] - g0,
             "proxy": r["eval_reward"] - p0} for r in pts]


def describe(points: list[dict]) -> str:
    """One sentence: where gold peaks, and whether the proxy kept rising past it."""
    if len(points) < 3:
        return "Too few evaluation points for an over-optimization curve."
    peak = max(range(len(points)), key=lambda i: points[i]["gold"])
    last = points[-1]
    where = f"sqrt(KL) = {points[peak]['sqrt_kl']:.2f} (step {points[peak]['step']})"
    if peak == 0 and last["proxy"] > 0:
        return (f"Gold never rose above its start (last: {last['gold']:+.3f}) while the proxy rose "
                f"({last['proxy']:+.3f}): the reward model did not carry the gold preference to PPO "
                "(or the run is too short to tell; the points carry sampling noise).")
    if peak < len(points) - 1 and last["proxy"] > points[peak]["proxy"] and last["gold"] < points[peak]["gold"]:
        return (f"Gold peaked at {where}, {points[peak]['gold']:+.3f} over the start, and fell to {last['gold']:+.3f} "
                f"while the proxy kept rising ({points[peak]['proxy']:+.3f} -> {last['proxy']:+.3f}): past that point "
                "PPO was gaming the reward model.")
    if peak == len(points) - 1:
        return (f"Gold was still rising at the last evaluation ({where}: gold {last['gold']:+.3f}, proxy "
                f"{last['proxy']:+.3f} over the start): no over-optimization within this KL.")
    return (f"Gold peaked at {where} ({points[peak]['gold']:+.3f}); the proxy did not keep rising after it "
            f"(last: gold {last['gold']:+.3f}, proxy {last['proxy']:+.3f}), so this is noise or a shared decline, "
            "not the proxy being gamed.")


def plot(points: list[dict], out: Path) -> Path | None:
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["sqrt_kl"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(x, [p["proxy"] for p in points], marker="o", label="proxy (reward model)")
    ax.plot(x, [p["gold"] for p in points], marker="s", label="gold (hidden judge)")
    for p in points:
        ax.annotate(str(p["step"]), (p["sqrt_kl"], p["gold"]), fontsize=7, xytext=(2, -9),
                    textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("sqrt(KL to the reference), nats^0.5 per answer")
    ax.set_ylabel("held-out score gain over step 0")
    ax.set_title("Over-optimization: gold vs proxy (labels: PPO step)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
