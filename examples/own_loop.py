# Your own model and loop, cfrobust's loss: CE + CF + F + Sal of each batch, then worst-group accuracy.
# Shards from `cfrobust preprocess ... --cf tile`. Run: python examples/own_loop.py SHARDS [STEPS]
import sys

import torch
import torchvision

import cfrobust

shards, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 500
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
config = cfrobust.TrainConfig(cf="tile", f="mrand", reg="bbox_o")  # the options of `cfrobust train`
data = cfrobust.TrainShards(f"{shards}/train", batch_size=32, cf_methods=[config.cf], seed=0,
                            num_workers=2, masks=True)  # masks: F and Sal keep the object's outline
loader = cfrobust.make_loader(data, num_workers=data.workers)  # 2, or fewer where the split is tiny
model = torchvision.models.resnet18(num_classes=len(data.info["classes"])).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
# objective(model, batch) -> ({"ce", "cf", "sal"}, logits of x)
objective = cfrobust.Objective(config, num_classes=len(data.info["classes"]))

step, epoch = 0, 0
model.train()
while step < steps:
    data.set_epoch(epoch)  # each epoch its own shard order
    for batch in loader:
        terms, _ = objective(model, batch.to(device))
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        step += 1
        print(f"step {step}:", " ".join(f"{name}={value.item():.4f}" for name, value in terms.items()))
        if step == steps:
            break
    epoch += 1

model.eval()
logits, labels, groups = [], [], []
with torch.no_grad():
    for batch in cfrobust.EvalShards(f"{shards}/val", batch_size=64):
        logits.append(model(cfrobust.normalize(batch.images.to(device))).float().cpu())
        labels.append(batch.labels)
        groups += batch.groups
figures = cfrobust.split_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy(), groups)
print(f"val accuracy {figures['accuracy']:.3f}, worst group {figures['worst_group_accuracy']:.3f}")
