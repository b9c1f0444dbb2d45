"""cfrobust: classifiers that look at the object, not its background.

Counterfactual and factual data generation with a saliency penalty, after Chang, Adam and
Goldenberg, "Towards Robust Classification Model by Counterfactual and Invariant Data
Generation", CVPR 2021.
"""

__version__ = "0.1.0"
