"""A tiny stand-in for ChatGLM's remote tokenizer (written for sftkit's tests): a Python tokenizer (no character
offsets) that reads its special tokens typed as text ("[gMASK]", "<|user|>") as ordinary characters, as ChatGLM's
SentencePiece tokenizer does; only their ids, asked for by name, are the special tokens."""
import json
import os

from transformers import PreTrainedTokenizer

SPECIALS = ["<unk>", "<pad>", "</s>", "[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]


class TinyGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "vocab.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, **kwargs):
        if vocab_file:
            with open(vocab_file, encoding="utf-8") as handle:
                self.vocab = json.load(handle)
        else:
            self.vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
        self.inverse = {index: token for token, index in self.vocab.items()}
        kwargs = {"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "</s>", **kwargs}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, self.vocab["<unk>"])

    def _convert_id_to_token(self, index):
        return self.inverse.get(index, "<unk>")

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix or "") + "vocab.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.vocab, handle)
        return (path,)
