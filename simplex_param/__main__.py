"""Command line: ``python -m simplex_param {demo,bench,soup} [options]``."""
import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("simplex_param.cli.demo", "learn mixing weights on synthetic data with a known true mixture"),
    "bench": ("simplex_param.cli.bench", "time the fused operator against the alternatives and the memory floor"),
    "soup": ("simplex_param.cli.soup_demo", "learn a model soup of K fine-tuned classifiers on a synthetic task"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simplex_param", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
