"""`meissonic-edge quant-sensitivity MODEL_DIR --out RECIPE.json`: the command over `quant/sensitivity.py`
and `quant/recipe_writer.py`."""

from __future__ import annotations

import argparse


def cmd_quant_sensitivity(args) -> None:
    from meissonic_edge.quant.recipe_writer import check_budget, check_recipe_path, report_paths, write_recipe
    from meissonic_edge.quant.sensitivity import DEFAULT_PROMPTS, measure_sensitivity

    out = check_recipe_path(args.out)  # before minutes of measuring: the path, then the budget
    check_budget(args.model_dir, args.budget_mb, args.budget_ratio, args.block_size)
    prompts = list(DEFAULT_PROMPTS) if args.prompts is None else args.prompts
    results = measure_sensitivity(
        args.model_dir,
        size=args.size,
        steps=args.steps,
        prompts=prompts,
        seed=args.seed,
        block_size=args.block_size,
        progress=not args.quiet,
        text_encoder_dir=args.text_encoder,
    )
    measurement = {"size": args.size, "steps": args.steps, "prompts": len(prompts), "seed": args.seed}
    recipe = write_recipe(results, out, args.budget_mb, args.budget_ratio, measurement=measurement)

    groups = sorted((r for r in results if r.scope == "group"), key=lambda r: r.kl, reverse=True)
    combined = next(r for r in results if r.scope == "all")
    int8 = recipe["components"]["transformer"]["int8_layers"]
    print("most sensitive to int4 (mean KL, top-1 agreement):")
    for r in groups[:5]:
        print(f"  {r.name}: KL {r.kl:.4g}, agreement {r.agreement:.4f}")
    print(f"  all groups at once: KL {combined.kl:.4g}, agreement {combined.agreement:.4f}")
    report_json, report_md = report_paths(out)
    print(f"wrote {out}: {len(int8)} layer pattern(s) at int8. {recipe['description']}")
    print(f"wrote {report_json} and {report_md}")


def add_sensitivity_parser(subparsers) -> argparse.ArgumentParser:
    """Register `quant-sensitivity` on the `meissonic-edge` subparsers; return its parser."""
    p = subparsers.add_parser(
        "quant-sensitivity",
        help="measure each layer group's int4 damage and write a mixed int4/int8 recipe under a size budget",
    )
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="the recipe to write (.json); its report goes beside it")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-mb", type=float, help="transformer weights on disk, in MB (10^6 bytes)")
    budget.add_argument(
        "--budget-ratio", type=float, default=0.3, help="transformer weights as a fraction of fp32 (default: 0.3)"
    )
    p.add_argument("--size", type=int, default=256, help="image size of the measurement (default: 256)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps measured (default: 4)")
    p.add_argument("--prompts", nargs="+", help="prompts to measure with (default: three built-in ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=32, help="int4 block size (default: 32)")
    p.add_argument("--text-encoder", help="take the text encoder and tokenizer from this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quant_sensitivity)
    return p
