"""Raw rows -> canonical conversations -> token ids and labels."""
