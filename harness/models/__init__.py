"""Built-in models. A user model is any callable ``f(rngs=, input_shape=, num_outputs=, **cfg) -> nnx.Module``."""
