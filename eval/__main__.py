"""`python -m eval`: the evaluation job (eval.suite)."""
from common.cli import run_main
from eval.suite import main

if __name__ == "__main__":
    run_main(main, "python -m eval")
