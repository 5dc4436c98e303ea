import os

import torch

# pytest-xdist runs two workers on CI's two cores: one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("CERTLAB_TEST_THREADS", "1")))
