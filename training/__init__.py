"""What only training needs: the EDM2 loss and the training loop (imports edm2, never the reverse)."""
