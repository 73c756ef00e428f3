"""The MLflow model gptpipe logs, as a model from code: MLflow runs this file to build it.

`tasks.registry.log_model` logs this file with the `model` and `storage` packages as the model's
code, and the checkpoint as its one artifact. MLflow loads the model by running its stored copy
of this file with that code first on sys.path, so serving the champion
(`mlflow models serve -m models:/NAME@champion`) needs only the model's declared requirements,
not gptpipe installed. Keep it so: this file imports MLflow, `model` and `storage`, never
Prefect, flows or tasks (a test serves the model where those cannot be imported).

Generation settings arrive as MLflow params (SAMPLING_PARAMS, the signature's params schema):
MLflow checks their types and fills in the defaults. Prompts sent together each get their own
random stream: row i is sampled with seed + i (`model.sample.row_seed`), so row 0 is the text
that prompt gets alone with that seed. A value out of range (a negative max_new_tokens, top_k
0) or a prompt with characters the tokenizer does not know is an INVALID_PARAMETER_VALUE
MlflowException, which the scoring server answers with a 400 and the message; any other
exception would be a bare "unexpected error".
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec

from model.sample import load_model, row_seed, sample_text
from storage.errors import GptpipeError

SAMPLING_PARAMS = ParamSchema(
    [
        ParamSpec("max_new_tokens", "long", 200),
        ParamSpec("temperature", "double", 1.0),  # 0 is greedy
        ParamSpec("top_k", "long", None),  # None: sample from the whole vocabulary
        ParamSpec("seed", "long", 1337),  # same seed, same text
    ]
)
DEFAULTS = {spec.name: spec.default for spec in SAMPLING_PARAMS.params}


class GPTTextGenerator(PythonModel):
    """predict(prompts) -> one text per prompt: the prompt and max_new_tokens generated tokens."""

    def load_context(self, context) -> None:
        self.loaded = load_model(context.artifacts["checkpoint"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """MLflow hands the prompts over as a one-column DataFrame (the signature's string
        column; the type hint keeps it so, and keeps MLflow from inferring a signature without
        params), checked to be strings. Row i is sampled with seed + i (see the module)."""
        settings = {**DEFAULTS, **(params or {})}
        top_k = settings["top_k"]
        try:
            return [
                sample_text(
                    self.loaded,
                    prompt,
                    max_new_tokens=int(settings["max_new_tokens"]),
                    temperature=float(settings["temperature"]),
                    top_k=None if top_k is None else int(top_k),
                    seed=row_seed(int(settings["seed"]), row),
                )[0]
                for row, prompt in enumerate(model_input.iloc[:, 0])
            ]
        except GptpipeError as exc:  # bad settings or prompt: the caller's to fix, a 400
            raise MlflowException.invalid_parameter_value(str(exc)) from None


set_model(GPTTextGenerator())
