"""CAGAN: the DeepFill v1 contextual-attention inpainter (Yu et al., CVPR 2018) in PyTorch,
loadable from the released TensorFlow checkpoints, and its use as the `cagan` counterfactual fill."""
