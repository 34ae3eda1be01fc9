"""Layer 7: the recipes' glue of network + objective + sampler + evaluators, one file per kind
of task, each registered under its `config.task` name. Importing this package registers the
built-in entries of every registry below the converters."""
import tesserax.eval.evaluators  # noqa: F401  (registers the evaluators)
import tesserax.generators  # noqa: F401  (registers the networks)
import tesserax.objectives  # noqa: F401  (registers the objectives)
import tesserax.sampling  # noqa: F401  (registers the samplers)
import tesserax.tokenizers  # noqa: F401  (registers the tokenizers)
from tesserax.tasks import autoencoder, diffusion  # registers the tasks
from tesserax.tasks import token_generator  # registers the token generator task
from tesserax.tasks import titok_task  # registers the TiTok tokenizer task
from tesserax.tasks import flextok_task  # registers the FlexTok tokenizer task
