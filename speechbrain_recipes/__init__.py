"""SpeechBrain recipes for MERT (pretraining in ``MERT/``, a frozen-encoder
classifier in ``MERT/downstream/``) and the checkpointing pieces they share."""
