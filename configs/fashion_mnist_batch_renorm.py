"""Fashion-MNIST, small ResNet-18 v2: batch renormalization with the paper's r_max/d_max
schedule scaled to the run's length (Ioffe, 2017: batch norm first, then r_max 1 -> 3
and d_max 0 -> 5; here plain batch norm for the first 1/16 of the steps, d_max = 5 at
5/16 and r_max = 3 at half the run; see nfnets.training.plan.scaled_renorm_schedules)."""

from configs import fashion_mnist_norms


def get_config():
    schedule = "paper_scaled"  # nfnets.training.plan.PAPER_SCALED
    return fashion_mnist_norms.get_config("batch_renorm", r_max=schedule, d_max=schedule)
