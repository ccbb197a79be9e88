"""FLARE: language fusion for parameter-efficient cross-lingual transfer."""
