"""A PyTorch replica of training/train.py's recipe, for sweeping its values on a lent GPU.

Not part of the product (the recipe is the Keras one; this only informed its values, see
training/NOTES.md). It needs PyTorch and a CUDA GPU, which the project's CPU environment
does not have:

    CONFIGS='[{"name": "w96-14", "widths": [96, 320, 320], "epochs": 14}]' \
        python3 training/gpu_sweep.py ../shared/data/cifar10-jpeg.tar.gz

Each config runs for seeds 0, 1, 2 (while BUDGET_S lasts) and reports test accuracy
without TTA (tta0), with mirror TTA (tta1), mirror + 1-px shifts (tta2, as shipped) and
mirror + all 9 one-pixel shifts (tta3).
"""
import io, json, math, os, sys, tarfile, time
from concurrent.futures import ProcessPoolExecutor
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image

torch.backends.cudnn.benchmark = True
dev = os.environ.get("DEV", "cuda")
MEAN = torch.tensor((0.4914, 0.4822, 0.4465)) * 255
STD = torch.tensor((0.2470, 0.2435, 0.2616)) * 255


def dec(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.uint8)


def load(path):
    items = {"train": [], "test": []}
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                p = m.name.split("/")
                items[p[-3]].append((m.name, p[-2], tar.extractfile(m).read()))
    classes = sorted({c for _, c, _ in items["train"]})
    out = {}
    with ProcessPoolExecutor(16) as ex:
        for s in ("train", "test"):
            it = sorted(items[s])
            x = np.stack(list(ex.map(dec, [d for _, _, d in it], chunksize=512)))
            y = np.array([classes.index(c) for _, c, _ in it])
            out[s] = (x, y)
    return out


class BN(nn.BatchNorm2d):
    def __init__(self, n, mom):
        super().__init__(n, eps=1e-12, momentum=1 - mom)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    def __init__(self, cin, cout, k=3, padding="same", bias=False):
        super().__init__(cin, cout, k, padding=padding, bias=bias)
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])
        if bias:
            self.bias.data.zero_()


class Block(nn.Module):
    def __init__(self, cin, cout, mom, depth3=False):
        super().__init__()
        self.c1, self.n1, self.c2, self.n2 = Conv(cin, cout), BN(cout, mom), Conv(cout, cout), BN(cout, mom)
        self.depth3 = depth3
        if depth3:
            self.c3, self.n3 = Conv(cout, cout), BN(cout, mom)

    def forward(self, x):
        x = F.gelu(self.n1(F.max_pool2d(self.c1(x), 2)))
        if not self.depth3:
            return F.gelu(self.n2(self.c2(x)))
        x0 = x
        x = F.gelu(self.n2(self.c2(x)))
        return F.gelu(self.n3(self.c3(x))) + x0


def make_net(widths, mom=0.6, d3=False):
    net = nn.Sequential(Conv(3, 24, 2, padding=0, bias=True), nn.GELU(),
                        Block(24, widths[0], mom, d3), Block(widths[0], widths[1], mom, d3), Block(widths[1], widths[2], mom, d3),
                        nn.MaxPool2d(3), nn.Flatten(), nn.Linear(widths[2], 10, bias=False))
    net[0].weight.requires_grad = False
    return net.to(dev).to(memory_format=torch.channels_last)


def whiten(layer, x, eps=5e-4):
    c, h, w = 3, 2, 2
    p = x.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
    flat = p.view(len(p), -1)
    ev, evec = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    ev, evec = ev.flip(0).view(-1, 1, 1, 1), evec.T.reshape(c * h * w, c, h, w).flip(0)
    s = evec / torch.sqrt(ev + eps)
    layer.weight.data[:] = torch.cat((s, -s))


def run(cfg, data, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = data["train"]
    perm = np.random.default_rng(12345).permutation(len(x))
    nv = cfg.get("val", 2000)
    val_idx, tr_idx = perm[:nv], perm[nv:]
    X = ((torch.tensor(x[tr_idx]).to(dev).float() - MEAN.to(dev)) / STD.to(dev)).permute(0, 3, 1, 2).contiguous()
    Y = torch.tensor(y[tr_idx]).to(dev)
    tx, ty = data["test"]
    TX = ((torch.tensor(tx).to(dev).float() - MEAN.to(dev)) / STD.to(dev)).permute(0, 3, 1, 2).contiguous()
    TY = torch.tensor(ty).to(dev)
    bs, epochs, mom = cfg.get("bs", 1024), cfg["epochs"], cfg.get("mom", 0.85)
    steps_per_epoch = len(X) // bs
    total = math.ceil(steps_per_epoch * epochs)
    ks = 1024 * (1 + 1 / (1 - mom))
    lr = cfg.get("lr", 11.5) / ks
    wd = 0.0153 * bs / ks
    lrb = lr * 64
    net = make_net(cfg["widths"], d3=cfg.get("d3", False))
    whiten(net[0], X[:5000])
    norm_b = [p for k, p in net.named_parameters() if ".n" in k and p.requires_grad]
    other = [p for k, p in net.named_parameters() if ".n" not in k and p.requires_grad]
    opt = torch.optim.SGD([dict(params=norm_b, lr=lrb, weight_decay=wd / lrb), dict(params=other, lr=lr, weight_decay=wd / lr)],
                          momentum=mom, nesterov=True)
    w = int(0.23 * total)
    sched = lambda s: (0.2 + 0.8 * s / w) if s < w else (1 + (0.07 - 1) * (s - w) / max(1, total - w))
    base_lrs = [lrb, lr]
    ls = cfg.get("ls", 0.2)
    flipmask = torch.rand(len(X), device=dev) < 0.5
    Xf = torch.where(flipmask.view(-1, 1, 1, 1), X.flip(-1), X)
    Xp = F.pad(Xf, (2,) * 4, "reflect")
    ema, step = None, 0
    cut = cfg.get("cutout", 0)
    t0 = time.time()
    for ep in range(math.ceil(epochs)):
        net[0].bias.requires_grad = ep < 3
        sh = torch.randint(0, 5, (len(X), 2), device=dev)
        imgs = torch.empty_like(X)
        for dy in range(5):
            for dx in range(5):
                m = (sh[:, 0] == dy) & (sh[:, 1] == dx)
                imgs[m] = Xp[m, :, dy:dy + 32, dx:dx + 32]
        if ep % 2 == 1:
            imgs = imgs.flip(-1)
        if cut:
            cy = torch.randint(0, 32, (len(X), 1), device=dev); cx = torch.randint(0, 32, (len(X), 1), device=dev)
            r = torch.arange(32, device=dev)[None]
            rows = (r >= cy - cut // 2) & (r < cy + (cut + 1) // 2)
            cols = (r >= cx - cut // 2) & (r < cx + (cut + 1) // 2)
            mask = rows[:, :, None] & cols[:, None, :]
            imgs = imgs.masked_fill(mask[:, None], 0.0)
        imgs = imgs.contiguous(memory_format=torch.channels_last)
        order = torch.randperm(len(X), device=dev)
        net.train()
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * bs:(i + 1) * bs]
            for g, b in zip(opt.param_groups, base_lrs):
                g["lr"] = b * sched(step)
            with torch.autocast(dev, dtype=torch.bfloat16):
                out = net(imgs[idx]) / 9
            loss = F.cross_entropy(out.float(), Y[idx], label_smoothing=ls, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if cfg.get("lookahead", True) and ep >= 3 and step % 5 == 0:
                sd = net.state_dict()
                if ema is None:
                    ema = {k: v.clone() for k, v in sd.items() if v.dtype == torch.float32}
                else:
                    rho = 0.95 ** 5 * (step / total) ** 3
                    for k, e in ema.items():
                        e.lerp_(sd[k], 1 - rho)
                        sd[k].copy_(e)
        if ema is not None:
            sd = net.state_dict()
            for k, e in ema.items():
                sd[k].copy_(e)
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.time() - t0
    net.eval()
    res = {}
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        def f(z): return net(z.contiguous(memory_format=torch.channels_last)).float()
        def mirror(z): return 0.5 * f(z) + 0.5 * f(z.flip(-1))
        outs = {0: [], 1: [], 2: [], 3: []}
        for z in TX.split(2000):
            l0 = f(z); l1 = mirror(z)
            p = F.pad(z, (1,) * 4, "reflect")
            l2 = 0.5 * l1 + 0.25 * (mirror(p[:, :, :32, :32]) + mirror(p[:, :, 2:, 2:]))
            outs[0].append(l0); outs[1].append(l1); outs[2].append(l2)
            l3 = sum(mirror(p[:, :, a:a + 32, b:b + 32]) for a in range(3) for b in range(3)) / 9
            outs[3].append(0.5 * l1 + 0.5 * l3)
        for k, v in outs.items():
            res[f"tta{k}"] = (torch.cat(v).argmax(1) == TY).float().mean().item()
    res["seconds"] = t
    return res


if __name__ == "__main__":
    t = time.time()
    data = load(sys.argv[1])
    print(f"decoded in {time.time() - t:.1f}s", flush=True)
    budget = float(os.environ.get("BUDGET_S", "420"))
    configs = json.loads(os.environ["CONFIGS"]) if "CONFIGS" in os.environ else [
        dict(name="a94-10", widths=[64, 256, 256], epochs=10),
        dict(name="a94-22", widths=[64, 256, 256], epochs=22),
        dict(name="w96-14", widths=[96, 320, 320], epochs=14),
        dict(name="w128-10", widths=[128, 384, 384], epochs=10),
        dict(name="a94-22-c8", widths=[64, 256, 256], epochs=22, cutout=8),
        dict(name="w96-14-c8", widths=[96, 320, 320], epochs=14, cutout=8),
        dict(name="w128-10-c8", widths=[128, 384, 384], epochs=10, cutout=8),
        dict(name="w96-14-c12", widths=[96, 320, 320], epochs=14, cutout=12),
        dict(name="w128-10-lr10", widths=[128, 384, 384], epochs=10, lr=10.0),
        dict(name="w96-14-nolook", widths=[96, 320, 320], epochs=14, lookahead=False),
    ]
    seeds = [0, 1, 2]
    results = []
    run(dict(widths=[64, 256, 256], epochs=1), data, 99)  # warm up cudnn
    start = time.time()
    for seed in seeds:  # seed-major: every config gets seed 0 before any gets seed 1
        for cfg in configs:
            if time.time() - start > budget:
                break
            r = run(cfg, data, seed)
            r.update(cfg=cfg["name"], seed=seed)
            results.append(r)
            print(json.dumps(r), flush=True)
    out = os.environ.get("OUT", ".")
    json.dump(results, open(os.path.join(out, "sweep.json"), "w"), indent=1)
    print("\nconfig           n  tta0    tta1    tta2    tta3    sec")
    for cfg in configs:
        rs = [r for r in results if r["cfg"] == cfg["name"]]
        if rs:
            m = lambda k: np.mean([r[k] for r in rs])
            print(f"{cfg['name']:<15} {len(rs)}  {m('tta0'):.4f}  {m('tta1'):.4f}  {m('tta2'):.4f}  {m('tta3'):.4f}  {m('seconds'):.1f}")
