"""How much leaked: PSNR / SSIM / LPIPS after optimal matching (``metrics``) and the
comparison grids for humans (``images``)."""
