"""Reading click logs, generating synthetic ones, and turning columns into Batches."""
