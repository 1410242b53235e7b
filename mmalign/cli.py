"""Command line: ``mmalign train | eval | guide | toy | config``.

Exit codes: 0 success, 2 bad input (one line per problem, naming the key / file / row), 1 internal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from mmalign.errors import UserError

DEFAULT_CONFIG = "configs/quickstart.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description="Align generative models to preferences.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a config, then evaluate (and run the control)")
    train.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    evaluate = commands.add_parser("eval", help="sample base and output_dir/final on held-out prompts, score")
    evaluate.add_argument("config")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.add_argument(
        "--final",
        action="append",
        default=None,
        metavar="NAME=DIR",
        help="models to compare with the base (default: aligned=OUTPUT_DIR/final and, if "
        "present, control=OUTPUT_DIR/control/final)",
    )

    guide = commands.add_parser(
        "guide",
        help="sample a frozen model with and without reward guidance from the same seeds, side by side",
    )
    guide.add_argument("config", help="YAML config with recipe: guide, e.g. configs/guide_video_toy.yaml")
    guide.add_argument("overrides", nargs="*", help="key.sub=value overrides (prompt=..., weights.NAME=λ)")

    config = commands.add_parser("config", help="print the resolved config, or every key with its meaning")
    config.add_argument("config", nargs="?")
    config.add_argument("overrides", nargs="*")

    pairs = commands.add_parser("pairs", help="build training data")
    pair_commands = pairs.add_subparsers(dest="pairs_command", required=True)
    tpo = pair_commands.add_parser(
        "tpo",
        help="add a mismatched caption to every captioned image of the config's data (TPO), as captions parquet",
    )
    tpo.add_argument("config", help="YAML config with recipe: tpo (its data and tpo sections are read)")
    tpo.add_argument("overrides", nargs="*")
    tpo.add_argument(
        "--out", required=True, help="parquet file to write (train it with tpo.perturber=column)"
    )

    toy = commands.add_parser("toy", help="toy-world assets")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    base = toy_commands.add_parser("build-base", help="pretrain the toy text-to-image base model (≈10 min)")
    base.add_argument("--out", default="assets/toy-t2i")
    base.add_argument("--seed", type=int, default=0)
    flow_base = toy_commands.add_parser(
        "build-flow-base", help="pretrain a toy rectified-flow base (Wan, pixel space) for a toy world"
    )
    flow_base.add_argument("--world", choices=("moving_shapes", "shapes"), default="moving_shapes")
    flow_base.add_argument("--out", default="assets/toy-video")
    flow_base.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as err:
        for line in str(err).splitlines():
            print(f"mmalign: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmalign: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from mmalign.config import SCHEMAS, describe, load_config, to_yaml

    if args.command == "config":
        if args.config is None:
            # every key of the default recipe, then what each other recipe adds
            shown = describe(SCHEMAS["preference"])
            print("\n".join(shown))
            for name, schema in SCHEMAS.items():
                extra = [line for line in describe(schema) if line not in shown]
                if extra and name != "preference":
                    print(f"# recipe: {name}\n" + "\n".join(extra))
        else:
            print(to_yaml(load_config(args.config, args.overrides)), end="")
        return 0
    if args.command == "toy":
        # the same entry points as `python -m mmalign.toy.base_model` / `.flow_base`, so both reproduce the
        # shipped assets
        if args.toy_command == "build-flow-base":
            from mmalign.toy import flow_base

            flow_base.main(["--world", args.world, "--out", args.out, "--seed", str(args.seed)])
            return 0
        from mmalign.toy import base_model

        base_model.main(["--out", args.out, "--seed", str(args.seed)])
        return 0
    if args.command == "guide":
        return _guide(args.config, args.overrides)
    cfg = load_config(args.config, args.overrides)
    if args.command == "pairs":
        return _pairs_tpo(cfg, args.out)
    if args.command == "train":
        return _train(cfg)
    return _eval(cfg, args.final)


def _guide(path: str, overrides: list[str]) -> int:
    from mmalign.config import GuideConfig, load_config, to_yaml
    from mmalign.recipes import guidance

    cfg = load_config(path, overrides, schema=GuideConfig)
    start = time.perf_counter()
    summary = guidance.run(cfg)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    dimensions = tuple(key[len("guided_latent_") :] for key in summary if key.startswith("guided_latent_"))
    print(guidance.format_summary(summary, dimensions))
    print(
        f"wrote {os.path.join(cfg.output_dir, 'guide.json')} and {summary['grid']} in {time.perf_counter() - start:.0f} s"
    )
    return 0


def _train_latent_reward(cfg) -> int:
    from mmalign.recipes import latent_reward

    if cfg.toy.enabled:
        from mmalign.toy import assets

        assets.ensure_base(cfg)
    result = latent_reward.train(cfg)
    print(
        f"trained a latent reward model ({', '.join(result['dimensions'])}) on {result['samples']} samples for "
        f"{result['steps']} steps in {result['seconds']:.0f} s -> {result['final_dir']}"
    )
    return 0


def _train(cfg) -> int:
    from mmalign.recipes import recipe, runtime

    if cfg.recipe == "latent_reward":
        return _train_latent_reward(cfg)
    start = time.perf_counter()
    runtime.check_backend()
    if not sys.stderr.isatty():
        runtime.quiet_library_bars()
    if cfg.toy.enabled:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        from mmalign.toy import assets

        # Under several processes rank 0 builds what is missing while the others wait, then find it built.
        # The process state is shared with the Accelerator made later, so it must see the same CPU flag.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        with state.main_process_first():
            assets.ensure_base(cfg)
            if not cfg.online.enabled and cfg.recipe != "branch_rl":  # online RL samples its own data
                assets.ensure_data(cfg)
    train = recipe(cfg.recipe)
    result = train(cfg)
    runs = {"aligned": result.output_dir}
    if cfg.toy.enabled and cfg.toy.control:
        control = _control_config(cfg)
        # the same base, validation prompts, seeds and sampler: its step-0 reward is already known
        train(control, base_val_reward=dict(result.val_history).get(0))
        runs["control"] = control.output_dir
    if not _is_main_process():
        return 0
    print(
        f"trained {_objective(cfg)} for {cfg.optim.max_steps} steps; exported step {result.exported_step} "
        f"-> {result.final_dir}"
    )
    if cfg.validation.every:
        from mmalign.recipes.evaluate import plot_validation

        plot_validation(os.path.join(cfg.output_dir, "samples", "reward_vs_step.png"), runs)
    if cfg.eval.enabled:
        _eval(cfg, [f"{name}={os.path.join(path, 'final')}" for name, path in runs.items()])
    print(f"done in {time.perf_counter() - start:.0f} s; run directory: {cfg.output_dir}")
    return 0


def _pairs_tpo(cfg, out: str) -> int:
    from mmalign.data.captioned import write_captioned_parquet
    from mmalign.recipes import kto, tpo

    if cfg.recipe != "tpo":
        raise UserError(f"`mmalign pairs tpo` reads a config with recipe: tpo, got recipe {cfg.recipe!r}")
    if cfg.tpo.perturber == "column":
        raise UserError("`tpo.perturber` must be rules or llm to build mismatched captions, got 'column'")
    tpo.check(cfg)
    records = kto.read_captioned_data(cfg, require_label=False)
    rows = tpo.mismatched_captions(cfg, records)
    write_captioned_parquet(out, rows, label_column=cfg.data.label_column)
    print(f"wrote {len(rows)} captioned images with mismatched captions ({tpo.family_counts(rows)}) -> {out}")
    return 0


def _objective(cfg) -> str:
    if cfg.recipe == "tpo":
        return {"kto": "TKTO", "sft": "sft"}.get(cfg.loss.name, f"TDPO ({cfg.loss.name})")
    if cfg.recipe == "branch_rl":
        return f"{cfg.rl.algorithm} (branch_rl)"
    return cfg.loss.name if cfg.recipe == "preference" else cfg.recipe


def _control_config(cfg):
    """Same base, same samples, same budget and selection — but the labels are thrown away: plain fine-tuning
    on a random member of each pair (preference), rewards shuffled within the batch (rwr), coin-flip labels
    (kto), or — TPO's own baseline — plain fine-tuning on the captioned images without mismatched captions."""
    changes = {}
    if cfg.recipe in ("preference", "tpo"):
        changes["loss"] = dataclasses.replace(cfg.loss, name="sft")
    if cfg.recipe != "tpo":  # TPO's control is supervised fine-tuning on the same correctly captioned images
        changes["data"] = dataclasses.replace(cfg.data, labels="random")
    return dataclasses.replace(
        cfg,
        output_dir=os.path.join(cfg.output_dir, "control"),
        eval=dataclasses.replace(cfg.eval, enabled=False),
        toy=dataclasses.replace(cfg.toy, control=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=None),
        **changes,
    )


def _eval(cfg, finals: list[str] | None) -> int:
    from mmalign.recipes import evaluate

    if finals is None:
        finals = [f"aligned={os.path.join(cfg.output_dir, 'final')}"]
        control = os.path.join(cfg.output_dir, "control", "final")
        if os.path.isdir(control):
            finals.append(f"control={control}")
    final_dirs = {}
    for item in finals:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isdir(path):
            raise UserError(f"--final {item!r} must be NAME=DIR with an existing folder written by training")
        final_dirs[name] = path
    # TPO's control is supervised fine-tuning on the captioned images; the others drop the labels
    control = "sft" if cfg.recipe == "tpo" else "no_labels"
    summary, grid = evaluate.evaluate_runs(
        cfg.model,
        final_dirs,
        prompts_spec=cfg.eval.prompts,
        seeds_per_prompt=cfg.eval.seeds_per_prompt,
        first_seed=cfg.eval.first_seed,
        reward_name=cfg.eval.reward,
        steps=cfg.sampling.steps,
        guidance_scale=cfg.sampling.guidance_scale,
        batch_size=cfg.sampling.batch_size,
        out_dir=cfg.output_dir,
        grid_prompts=cfg.eval.grid_prompts,
        world=cfg.toy.world,
        control=control,
    )
    print(evaluate.format_table(summary, list(final_dirs)))
    if "aligned" in final_dirs:
        print(evaluate.format_checks(summary, control=control))
    print(f"wrote {os.path.join(cfg.output_dir, 'eval.json')} and {grid}")
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
