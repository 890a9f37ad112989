"""What training reads from our rows: loss-mask spans (`masks`) and tokenised labels (`labels`)."""
