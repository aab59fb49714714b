"""Make the small report shown in docs/screenshots: a 3-layer MLP that does three sign tasks (chosen by a one-hot
task input), its masks after 300 steps, and the report as one HTML page.

    python docs/screenshots/make_report.py report.html
    chromium --headless --no-sandbox --disable-gpu --screenshot=report.png --window-size=1200,6000 file://$PWD/report.html

The PNGs here are that screenshot cut in two after "Overlap" and reduced to 256 colours.
"""
import sys

import torch

import modscope

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                          torch.nn.Linear(32, 2))
rules = {"first_sign": lambda x: x[:, 0] > 0, "second_sign": lambda x: x[:, 1] > 0, "sum_sign": lambda x: x[:, 2] + x[:, 3] > 0}
data = {}
for i, (name, rule) in enumerate(rules.items()):
    x = torch.randn(512, 9)
    x[:, 6:] = 0
    x[:, 6 + i] = 1
    data[name] = (x, rule(x).long())
opt = torch.optim.Adam(net.parameters(), 1e-2)
for step in range(600):
    x, y = data[list(rules)[step % 3]]
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
tasks = [modscope.Task(name, x, y) for name, (x, y) in data.items()]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
masks = modscope.train_masks(net, tasks, modscope.MaskConfig(n_steps=steps, batch_size=128, seed=0), progress=False)
report = modscope.Report.from_masks(masks, net, tasks)
with open(sys.argv[1], "w") as f:
    f.write(report.to_html(title="modscope report (screenshot example)"))
