from feast import Project

derm_project = Project(
    name="derm",
    description="DERM user and Pin embeddings, counting features and the ranker feature services.",
)
