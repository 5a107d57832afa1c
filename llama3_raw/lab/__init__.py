"""The lab: why each piece of Llama 3 is there, trained and measured (`python -m llama3_raw.lab`, docs/lab.md).

ladder.py  the ladder: the same recipe, seed and training loop (training/loop.py) for Llama 3 and for each
           variant with one piece swapped (training/variants.py); the results as JSON, a picture and a table
report.py  the picture (every validation curve, in nats per character) and the markdown table
claims.py  the seeds' claims measured: KV cache work per token, KV bytes of MHA vs GQA, RMSNorm vs LayerNorm
           time, what RoPE does (`python -m llama3_raw.lab.claims`)
"""

from .ladder import LAB_RECIPE, QUICK_RECIPE, run_lab

__all__ = ["LAB_RECIPE", "QUICK_RECIPE", "run_lab"]
