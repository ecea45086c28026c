"""The synthetic hallucination benchmark ("gym") and its trained tiny LLaVA (specs/gym.md)."""
