"""LAG's experiment on the embedded corpus (examples/lag_study.sh): 4 -> 6 layers, the full design
space (12 candidates), each trained to the end; how well the loss at step t predicts the final loss.

    python bench/lag_study.py [--output runs/lag_study] [--steps 300]

Last line: JSON with `spearman_at_growth` (the first evaluation after growth), `spearman_at_k` and
`pearson_at_k` (after --k iterations), `regret_at_k`, `relative_regret_at_k`, `settling_step`.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/lag_study")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=60, help="the LAG step to report (a multiple of steps / 20)")
    a = p.parse_args()
    subprocess.run(["bash", os.path.join(ROOT, "examples", "lag_study.sh")], check=True,
                   env={**os.environ, "OUT": a.output, "STEPS": str(a.steps)})
    with open(os.path.join(a.output, "study", "study", "analysis", "lag_analysis.json")) as f:
        s = json.load(f)
    i = s["steps"].index(a.k) if a.k in s["steps"] else min(range(len(s["steps"])), key=lambda j: abs(s["steps"][j] - a.k))
    figures = {"steps": s["steps"][-1], "candidates": len(s["specs"]), "k": s["steps"][i],
               "spearman_at_growth": s["spearman"][0], "pearson_at_growth": s["pearson"][0],
               "spearman_at_k": s["spearman"][i], "pearson_at_k": s["pearson"][i], "regret_at_k": s["regret"][i],
               "relative_regret_at_k": s["relative_regret"][i], "settling_step": s["settling_step"],
               "final_best": s["final_best"]}
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures))
    sys.exit(0)


if __name__ == "__main__":
    main()
