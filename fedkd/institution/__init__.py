"""What runs at an institution: the teacher host that answers queries, the teacher-side terms, the client's
training recipe and its privacy (DP-SGD, output noise, PATE, the ledger that enforces its budget).

Nothing here imports the coordinator's side (``fedkd.coordinator``); both sides share only the floor of
``fedkd`` (the contract, the codec, options, data, models). A test checks it in a fresh interpreter."""
