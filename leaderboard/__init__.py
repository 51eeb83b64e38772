"""The mergebench Streamlit leaderboard (run: `mergebench leaderboard`)."""
