"""File-format helpers behind ``llamaforge.tokenizer`` (the public interface lives there)."""
