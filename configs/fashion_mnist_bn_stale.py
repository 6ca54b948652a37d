"""A deliberately broken run for the BN doctor (README: "My validation accuracy collapsed").

Batch norm with ``momentum=0.9999`` (the weight on the OLD running value) for only
300 steps and no PreciseBN: the running averages keep 0.9999^300 = 97% of their
initial mean 0 / var 1, so eval-mode normalization is wrong although training
looks fine. ``python -m nfnets.doctor --workdir <run>`` names the cause and the fix.
"""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("batch_norm", momentum=0.9999)
    c.num_train_steps = 300
    c.precise_bn_batches = 0
    c.log_every_steps = 50
    c.progress_bar = False
    return c
