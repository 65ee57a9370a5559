"""Reading features back out of the platform: fast point-in-time retrieval that stays a Feast offline store."""
