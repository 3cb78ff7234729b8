"""What a pack changes in the skeleton of a Hugging Face ``transformers`` model (none for others).

* ``config.use_cache`` is switched off: a key/value cache is an object (``DynamicCache``), not a
  tensor, and cannot be stacked per member. An explicit ``use_cache=True`` raises in the forward.
* ``gradient_checkpointing_enable()`` adds a forward hook on the input embeddings that calls
  ``output.requires_grad_(True)``, which torch refuses under vmap. The hook is dropped; what it is
  for (reentrant checkpointed layers give gradients although the embeddings' output might not
  require one) is kept by :func:`modelbatch._activation_checkpoint.running_pack`.

Members returned by ``batch.member(i)`` are untouched.
"""

from __future__ import annotations

from torch import nn

#: The name of the forward hook ``enable_input_require_grads()`` registers (transformers 4.x-5.x).
_REQUIRE_GRADS_HOOK = "make_inputs_require_grads"


def adapt_skeleton(module: nn.Module) -> bool:
    """Adapt a pack's skeleton in place; returns whether checkpointed regions must give gradients."""
    inputs_require_grad = False
    for layer in module.modules():
        config = getattr(layer, "config", None)
        if getattr(config, "use_cache", None) is True:
            config.use_cache = False
        for key, hook in list(layer._forward_hooks.items()):
            if getattr(hook, "__name__", None) == _REQUIRE_GRADS_HOOK:
                del layer._forward_hooks[key]
                inputs_require_grad = True
    return inputs_require_grad
