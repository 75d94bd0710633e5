"""The training loop (:mod:`.trainer`) and the behaviour-cloning agent (:mod:`.agents`)."""
