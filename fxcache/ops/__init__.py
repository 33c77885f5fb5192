"""Tensor maths that runs inside the variant graphs (inserted with `call_function`): token scores and top-k,
row gathers and scatters, k-means and the ClusCa refresh. Plain functions of tensors and Python constants, so
Inductor, torch.export and the eager lowering trace them like any op."""
