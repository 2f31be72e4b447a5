"""Power of the calibrated statistics on tiny_moe: share of watermarked texts at p <= 1e-3 (R = 999) per
statistic (z, llr, green) and per number of exact top tokens in gamma (16, 64, 256), for 4 keys x 64
prompts x 64 tokens. The statistic table of docs/statistics.md comes from one run: python scripts/statistic_power.py
"""
import torch, numpy as np
torch.set_num_threads(2)
from moewm import load_model, ModelConfig
from moewm.config import ExtractorConfig, EncoderConfig, WatermarkConfig, GenerationConfig
from moewm.schemes.moe_lsh import MoELSHWatermark
from moewm.engine.keys import WatermarkKey
from moewm.engine.scoring import CaptureBatch, StatisticSpec, calibrated
model, tok = load_model(ModelConfig())
prompts = open('conf/data/prompts.txt').read().splitlines()[:64]
res = {}
for seed in range(4):
    wm = MoELSHWatermark(model, tok, ExtractorConfig(), EncoderConfig(), WatermarkConfig(capture_top_k=256), WatermarkKey("statistic-power-study", seed))
    with wm:
        pids, wids = wm.generate_ids(prompts, GenerationConfig(max_new_tokens=64, min_new_tokens=64, batch_size=32))
        caps = wm.capture(wids, pids)
        ref = wm.reference_tables()
        base = wm.score(caps)
        res.setdefault('z>4 (exact model null, normal)', []).append(np.mean(np.nan_to_num(base.z_score, nan=-9) > 4))
        res.setdefault('model-null exact p<=1e-3', []).append(np.mean(np.nan_to_num(base.p_value_model_null, nan=1) <= 1e-3))
        for stat in ('z','llr','green'):
            for K in (16, 64, 256):
                if stat=='green' and K!=64: continue
                spec = StatisticSpec(kind=stat, delta=2.0)
                det=[]
                for s in range(0, 64, 16):
                    b = CaptureBatch.stack(caps[s:s+16]).with_top_k(K)
                    r = calibrated(b, wm._true_tables, ref, spec, stop_after=10)
                    det.extend(r.p_value <= 1e-3)
                res.setdefault(f'{stat} K={K} calibrated p<=1e-3', []).append(np.mean(det))
for k,v in res.items(): print(f'{k:40s} mean {np.mean(v):.3f}  per key {np.round(v,3)}')
