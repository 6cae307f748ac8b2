"""The batch API's machinery (docs/batches.md): batch records and their store (SQLite or Redis),
safe archive extraction, the scheduler that feeds items to the engine behind interactive
requests, and signed webhooks. The HTTP routes are in ``service.router.batches``."""
