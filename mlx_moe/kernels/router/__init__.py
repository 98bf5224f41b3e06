"""The router kernel: a decode step's routing (logits, top-k, weights) in one
custom kernel per MoE layer; ``backend`` launches it, ``sources`` assembles it."""
