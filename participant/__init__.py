"""The participant agent: one gRPC daemon per PostgreSQL database ("shard").

It turns the coordinator's messages into a branch transaction, `PREPARE TRANSACTION`,
`COMMIT PREPARED` and `ROLLBACK PREPARED`, and never decides a prepared branch alone.
"""
