import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_ref():
    """B1's reference MLP (trained for 20 epochs to keep the suite quick) and its loaders."""
    from lccompress import digits

    data = digits.loaders(0)
    return digits.train_reference(0, epochs=20, data=data), data
