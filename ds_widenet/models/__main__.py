"""`python -m ds_widenet.models [--json]`: the presets with parameter counts (shared weights once)."""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = ap.parse_args()
    from .presets import PRESETS, build_model, count_params

    rows = []
    for name, (cfg, paper_m) in PRESETS.items():
        n = count_params(build_model(cfg, device="meta"))
        moe = cfg.moe
        rows.append({"name": name, "arch": cfg.arch, "params": n, "paper_params_m": paper_m,
                     "img_size": cfg.img_size, "patch_size": cfg.patch_size, "num_classes": cfg.num_classes,
                     "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                     "ffn_dim": cfg.mlp_dim if cfg.arch != "widenet" else None,
                     "expert_dim": moe.expert_dim if moe else None, "num_experts": moe.num_experts if moe else None})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'preset':16} {'arch':8} {'img/patch':>9} {'hidden':>6} {'depth':>5} {'heads':>5} {'ffn/expert':>11} "
          f"{'experts':>7} {'params':>10} {'paper':>7}")
    for r in rows:
        ffn = f"{r['ffn_dim'] or '-'}/{r['expert_dim'] or '-'}"
        paper = f"{r['paper_params_m']}M" if r["paper_params_m"] else "-"
        print(f"{r['name']:16} {r['arch']:8} {r['img_size']:>5}/{r['patch_size']:<3} {r['embed_dim']:>6} {r['depth']:>5} "
              f"{r['num_heads']:>5} {ffn:>11} {r['num_experts'] or '-':>7} {r['params'] / 1e6:>9.2f}M {paper:>7}")


if __name__ == "__main__":
    main()
