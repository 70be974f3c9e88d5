"""One epoch of PTB's first 200,000 tokens, dense vs DGC variants (notes/embedding-divergence.md).

    MOM=0.9 LR=2.0 python notes/embedding_ptb.py dense,dgc,nomask,nocorr
    MOM=0 LR=20 python notes/embedding_ptb.py dense,dgc

("dgc" is the paper's masking on every tensor; "delayed" ran at commit 7f1cdc3.)  Runs go to /tmp/emb/.
"""
import sys, json, time, torch
torch.set_num_threads(1)
from gradcomp.train.config import Data, Exchange, Launch, Model, Optim, Output, Schedule, TrainConfig
from gradcomp.train.loop import run
names = sys.argv[1].split(",")
import os
MOM = float(os.environ.get("MOM", "0.9")); LR = float(os.environ.get("LR", "2.0")); TIE = os.environ.get("TIE") == "1"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
common = TrainConfig(data=Data(dataset="ptb", batch_size=5, bptt=35, limit_train=tokens, limit_test=20_000),
                     model=Model(name="lstm", options=({'tie_weights': True} if TIE else {})),
                     exchange=Exchange(method="none"), optim=Optim(lr=LR, momentum=MOM, clip_norm=0.25),
                     schedule=Schedule(epochs=1, lr_decay=0.25), launch=Launch(workers=4, seed=0, simulate=True),
                     output=Output(progress=False))
dgc = {"density": 0.001, "warmup_epochs": 1/40}
opts = {"dgc": {"momentum_masking": True}, "auto": {}, "nomask": {"momentum_masking": False},
        "nocorr": {"momentum_correction": False}}
for n in names:
    t = time.time()
    output = {"run_dir": f"/tmp/emb/run-{n}-{tokens}-m{MOM}-lr{LR}-t{TIE}"}
    if n == "dense":
        cfg = common.replace(output=output)
    else:
        cfg = common.replace(exchange=Exchange(method="dgc", options={**dgc, **opts[n]}), output=output)
    s = run(cfg, plot=False, echo=lambda _: None)
    print(n, tokens, MOM, LR, TIE, f"ppl {s['test_perplexity']:.2f}", f"{time.time()-t:.0f}s", flush=True)
