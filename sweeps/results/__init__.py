"""A sweep's results on disk: where they live, what is kept, the summary, the decoded caches."""
