"""The sparse puzzle embedding and its sign-SGD: train and eval lookups, equality with a dense implementation,
and a world size without a process group."""


import torch

from models.sparse_embedding import CastedSparseEmbedding, CastedSparseEmbeddingSignSGD_Distributed


def test_sparse_embedding_train_and_eval_lookup():
    emb = CastedSparseEmbedding(5, 3, batch_size=4, init_std=1.0, cast_to=torch.float32)
    ids = torch.tensor([4, 0, 4, 2], dtype=torch.int32)
    emb.eval()
    torch.testing.assert_close(emb(ids), emb.weights[ids])
    emb.train()
    out = emb(ids)
    assert out is emb.local_weights or out.data_ptr() == emb.local_weights.data_ptr()
    torch.testing.assert_close(emb.local_weights.detach(), emb.weights[ids])
    assert torch.equal(emb.local_ids, ids)
    assert set(emb.state_dict()) == {"weights"}
    emb.to(torch.device("cpu"), torch.float64)  # after a move the local buffer is still a grad-receiving leaf
    assert emb.local_weights.is_leaf and emb.local_weights.requires_grad


def test_sparse_sign_sgd_matches_dense_implementation():
    torch.manual_seed(0)
    emb = CastedSparseEmbedding(6, 3, batch_size=5, init_std=1.0, cast_to=torch.float32)
    emb.train()
    ids = torch.tensor([1, 4, 1, 5, 3], dtype=torch.int32)
    target = torch.randn(5, 3)
    ((emb(ids) - target) ** 2).sum().backward()
    local_grad = emb.local_weights.grad.clone()
    before = emb.weights.clone()

    lr, wd = 0.1, 0.5
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=lr, weight_decay=wd)
    opt.step()

    dense_grad = torch.zeros_like(before).index_add_(0, ids.long(), local_grad)  # duplicates summed
    touched = torch.zeros(6, dtype=torch.bool)
    touched[ids.long()] = True
    expected = torch.where(touched.unsqueeze(-1), before * (1 - lr * wd) - lr * torch.sign(dense_grad), before)
    torch.testing.assert_close(emb.weights, expected, rtol=0, atol=1e-6)
    assert torch.equal(emb.weights[~touched], before[~touched])  # untouched rows: no decay either

    opt.zero_grad()
    assert emb.local_weights.grad is None or torch.all(emb.local_weights.grad == 0)


def test_sparse_sign_sgd_world_size_without_process_group_is_local():
    emb = CastedSparseEmbedding(4, 2, batch_size=2, init_std=1.0, cast_to=torch.float32)
    emb.train()
    emb(torch.tensor([0, 2], dtype=torch.int32)).sum().backward()
    before = emb.weights.clone()
    CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=8, lr=0.5, weight_decay=0.0).step()
    torch.testing.assert_close(emb.weights[[0, 2]], before[[0, 2]] - 0.5)
