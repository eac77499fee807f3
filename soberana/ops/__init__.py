"""soberana.ops"""
