"""BD-VAX itself: synthetic variants, twins, Eq. 2 scores, the signature, budgets and the one-call purify."""
