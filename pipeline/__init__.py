"""The stage jobs of an MCL run: train, embed, cluster, assign, merge; the loader, the loss, sidecars."""
