"""Pure PyTorch: the lecture's GPT, its tokenizers and data, training, evaluation and sampling."""
