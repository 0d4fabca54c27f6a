"""promptbase (Medprompt) strategies for the evaluation harness: kNN dynamic few-shot, self-generated chain of
thought, choice-shuffle ensembles and a scratch-pad gate, on any multiple-choice task and any LM backend.
See runner.py for the strategies and docs/promptbase.md for the method and measured results."""

from phiforge.eval.strategies.runner import (
                                             PRESETS,
                                             Strategy,
                                             StrategyRunner,
                                             TaskData,
                                             evaluate_strategies,
                                             format_strategy_table,
                                             load_task_data,
                                             parse_strategy,
)

__all__ = ["PRESETS", "Strategy", "StrategyRunner", "TaskData", "evaluate_strategies", "format_strategy_table",
           "load_task_data", "parse_strategy"]
