"""Built-in labeled and contrastive data, each built from material a package ships by a documented, seeded rule.

One module per data set; each says where its material comes from and the
exact rule that turns it into examples, so anyone can rebuild it.
"""
