"""The threat side: attacks, judges, skills, suspicious-model artifacts, and the evaluation scoring them."""
